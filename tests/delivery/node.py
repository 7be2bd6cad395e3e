"""One delivery node for the end-to-end tests: the real DeliveryService on the
real reactor, in a process of its own (Twisted's reactor cannot be restarted
inside pytest, and the multi-node tests kill it with SIGKILL).

    python -m tests.delivery.node --database URL --dest OAKNH=127.0.0.1:3575 [--dest ...]
        [--timeout S] [--retry-initial S] [--retry-max S] [--poll S]

Prints "node ready" once started; SIGTERM/SIGINT stop it cleanly. Logs go to stderr.
"""
from __future__ import annotations

import argparse
import sys

from twisted.internet import reactor
from twisted.logger import LogLevel, LogLevelFilterPredicate, FilteringLogObserver, globalLogBeginner, textFileLogObserver

from exchange.delivery import DeliveryService, Settings
from tests.support import delivery_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database", required=True)
    parser.add_argument("--dest", action="append", default=[])
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--retry-initial", type=float, default=0.1)
    parser.add_argument("--retry-max", type=float, default=0.5)
    parser.add_argument("--poll", type=float, default=0.2)
    args = parser.parse_args()
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])], redirectStandardIO=False
    )
    destinations = dict(d.split("=", 1) for d in args.dest)
    service = DeliveryService(
        reactor,
        args.database,
        destinations,
        Settings(timeout=args.timeout, retry_initial=args.retry_initial, retry_max=args.retry_max, poll=args.poll),
        config=delivery_config(destinations),  # every destination subscribes to ADT^* and MDM^*
    )
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    print("node ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
