"""Training loop components: tracking sinks, metrics, and (elsewhere in this package) the trainer pieces."""
