//! Servers and clients that hold, churn and close TCP connections (tracker tests).
