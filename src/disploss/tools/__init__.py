"""Tools built on the library: the CPU demo (demo), the benchmark (bench) and the digits experiment (digits)."""
