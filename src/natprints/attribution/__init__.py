"""Attribution: which known model wrote a text, from the text alone (and, for the ceiling, the weights)."""
