"""Dashboard reads; every one takes the tenant whose data it reads."""
