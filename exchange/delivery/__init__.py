"""Delivery of routed copies to the facilities (issue 5, items 4 and 5).

The intake's writer queues each copy in the outbox (``exchange.store.outbox.enqueue``)
in the transaction that commits the inbound message, so a copy exists once the
sender has its ACK. From there:

- ``policy`` (pure): what a destination's ACK means (``judge``) and when to try
  again (``backoff``), and the settings (``Settings``);
- ``worker`` (Twisted, in the reactor process): ``DeliveryService`` runs one
  ``DestinationWorker`` per facility with ``deliver_to``, each sending its
  destination's copies one at a time, oldest first, over MLLP, and recording
  the outcome in the outbox from a thread pool.

Wiring (``exchange.app.ExchangeService``): ``copies_committed(destinations)``
after each committed batch that queued copies wakes those destinations' workers
at once; without it they still find the copies within ``server.delivery_poll``
seconds (as they find the copies other nodes queued).
"""
from exchange.delivery.policy import Settings, backoff, judge
from exchange.delivery.worker import DeliveryService, DestinationWorker

__all__ = ["DeliveryService", "DestinationWorker", "Settings", "backoff", "judge"]
