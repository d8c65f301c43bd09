"""`python -m uvicorn ...` under cProfile; the stats are written to $PROFILE_OUT when the
process gets SIGTERM. bench/throughput.py --cprofile FILE starts Pantheon this way.
(Since Python 3.12 a profiler sees every thread, the database threads included.)"""

import cProfile
import os
import signal
import sys

if __name__ == "__main__":
    profile = cProfile.Profile()

    def dump(*_):
        profile.disable()
        profile.dump_stats(os.environ["PROFILE_OUT"])
        os._exit(0)

    signal.signal(signal.SIGTERM, dump)
    sys.argv = ["uvicorn", *sys.argv[1:]]
    profile.enable()
    import uvicorn.main

    uvicorn.main.main()
