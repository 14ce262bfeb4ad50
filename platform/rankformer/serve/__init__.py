"""The HTTP endpoints on Ray Serve (`rankformer serve`)."""
