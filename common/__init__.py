"""medfed's shared core: config, data, models, metrics and wire keys. Imports no other medfed package."""
