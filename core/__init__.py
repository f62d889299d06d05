"""What the server and the worker share: settings, errors, the store, the model client, job names."""
