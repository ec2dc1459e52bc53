"""txcallme: RPC over AMQP for Twisted."""
