"""Architecture facts as data (mapping tables) and their binding to a model's modules."""
