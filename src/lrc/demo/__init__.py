"""`lrc demo`: an application of the library (nothing in the package imports it)."""
