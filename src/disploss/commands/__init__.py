"""Commands: argument parsing and dispatch only. Each module builds the library's typed config from its flags,
calls the library, and maps a UsageError to a one-line message (report.py)."""
