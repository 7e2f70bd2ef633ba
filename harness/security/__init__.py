"""Security and compliance checks (PS3.15): TLS, access control, audit trails, patient data.

Each probe module returns `Check`s (checks.py); the security scenario lays them side by
side per node and the readiness report's compliance section renders them.
"""
