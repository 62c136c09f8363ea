"""Planning before spending: resource estimates (``tunelab estimate``) and hyperparameter
search (``tunelab sweep``)."""
