"""The benchmark behind `disploss bench`: its configuration (config), the sections it times (sections), the timing
harness and MFU (harness) and the reference code run side by side (reference)."""
