"""The loopfile backend."""
