"""ainode: receive, store, route, queue, encode and deliver."""

__version__ = "0.1.0"
