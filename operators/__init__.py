"""The stages of the streamsight dataflow as small, typed units."""
