"""The Qt-free core: everything a user can do, as plain functions and classes with typed events."""
