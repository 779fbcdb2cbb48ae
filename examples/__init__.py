"""Examples built on the library: models, data and jobs that live outside it."""
