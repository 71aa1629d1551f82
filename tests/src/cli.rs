//! Running drain-user inside a test namespace (helpers for the gate CLI tests).
