"""Plumbing every layer uses: params (config), atomic I/O, errors, the name rules, processes and the device."""
