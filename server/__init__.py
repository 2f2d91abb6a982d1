"""loraserve's front ends: the command line, the HTTP API and the engine process behind it."""
