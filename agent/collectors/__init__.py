"""Collectors: they read the box and produce records. They never touch the network."""
