"""Which bundle is live (the pointer) and swapping the worker to a new one in place."""
