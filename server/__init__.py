"""loraserve's front ends: the command line (and, with the server issue, the HTTP API)."""
