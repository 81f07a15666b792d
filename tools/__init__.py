"""Tools that users run beside the flow."""
