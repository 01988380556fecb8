"""Composition roots: the daemon (config, control socket, metrics), the demo and the
command-line areas. Nothing below imports them."""
