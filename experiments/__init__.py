"""Scripts that run experiments on the library (not imported by it); a package so that tests can import them."""
