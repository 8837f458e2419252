"""The real system parts the kit starts and stops: each found on the machine, run on a free loopback port
from a temporary directory, and stopped and removed, even when something fails.

A missing part makes its experiments print one line and skip, unless
`SSE_LAB_REQUIRE_SYSTEM_PARTS=1` (set in CI) makes it an error.
"""
