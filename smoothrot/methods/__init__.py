"""How each method chooses a site's transform."""
