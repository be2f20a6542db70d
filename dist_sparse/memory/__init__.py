"""Memory: predicted training-state bytes per rank (plan.py); measurement lives in integration/accounting.py."""
