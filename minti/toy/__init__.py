"""The toy world: a renderer of simple scenes with exact labels (world), the classifier that reads images
back into those labels (oracle), the tiny SD-architecture model trained on it (model), and the evaluation
of learned words with the oracle (evaluate). It imports the core of minti; the core never imports it."""
