"""Backends run one exported component at a time behind the small ``Session`` interface."""
