"""A txcallme server written with pika from README's "Wire protocol" section
and docs/wire.rst alone (no txcallme imports). Run: pika_server.py AMQP_URL SERVER_ID

Declares the server's exchange and queue with txcallme's flags, serves
``add``, ``div``, ``echo_properties`` and ``slow``, answers errors with
error envelopes, and prints ``ready`` once it consumes. Stops on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import traceback

import pika
import pika.exceptions


def add(a, b):
    return a + b


def div(a, b):
    return a / b


FUNCTIONS = {"add": add, "div": div, "slow": time.sleep}

#: reply_to of a caller using RabbitMQ's Direct Reply-to (the broker hands the
#: server ``amq.rabbitmq.reply-to.<token>``)
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


def reply_destination(reply_to: str) -> tuple[str, str]:
    """(exchange, routing key) of a reply: the caller's exchange with its name as
    key, or for Direct Reply-to the default exchange with reply_to as key."""
    if reply_to.startswith(DIRECT_REPLY_TO):
        return "", reply_to
    return reply_to, reply_to


def error(exc_type: str, message: str, args=None, text="") -> dict:
    return {"error": {"type": exc_type, "message": message,
                      "args": [message] if args is None else args, "traceback": text}}


def handle(body: bytes, props) -> dict | None:
    """The reply envelope for one request, or None for a late one."""
    if props.content_type not in (None, "application/json"):
        return error("txcallme.errors.InvalidRequest",
                     f"content type {props.content_type!r} not accepted")
    try:
        request = json.loads(body)
    except ValueError as e:
        return error("txcallme.errors.InvalidRequest", f"invalid JSON: {e}")
    if not isinstance(request, dict) or not isinstance(request.get("method"), str) \
            or set(request) - {"method", "args", "kwargs", "deadline"}:
        return error("txcallme.errors.InvalidRequest", "wrong request shape")
    deadline = request.get("deadline")
    if deadline is not None and time.time() > deadline:
        return None  # the caller has given up: not run, no reply
    method = request["method"]
    args, kwargs = request.get("args", []), request.get("kwargs", {})
    if method == "echo_properties":
        return {"result": {"content_type": props.content_type,
                           "expiration": props.expiration,
                           "correlation_id": props.correlation_id,
                           "reply_to": props.reply_to, "args": args, "kwargs": kwargs,
                           "deadline": deadline}}
    func = FUNCTIONS.get(method)
    if func is None:
        return error("txcallme.errors.UnknownMethod", f"no function {method!r}")
    try:
        return {"result": func(*args, **kwargs)}
    except Exception as e:
        return error(type(e).__name__, str(e), [str(a) for a in e.args],
                     traceback.format_exc())


def main(url: str, server_id: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    exchange, queue = f"server_{server_id}_ex", f"server_{server_id}_queue"
    channel.exchange_declare(exchange, "direct", durable=False, auto_delete=True)
    channel.queue_declare(queue, durable=True, auto_delete=True)
    channel.queue_bind(queue, exchange, routing_key=server_id)
    channel.basic_qos(prefetch_count=1)

    # Replies go out on a channel of their own, with confirms: a reply to an
    # exchange that is gone (404) or may not be written (403) closes only that
    # channel; the reply is dropped and the next one gets a new channel.
    replies = [None]

    def reply(reply_to: str, body: dict, correlation_id) -> None:
        if replies[0] is None or not replies[0].is_open:
            replies[0] = connection.channel()
            replies[0].confirm_delivery()
        try:
            replies[0].basic_publish(*reply_destination(reply_to), json.dumps(body).encode(),
                                     pika.BasicProperties(correlation_id=correlation_id,
                                                          content_type="application/json"))
        except pika.exceptions.ChannelClosedByBroker as e:
            print(f"reply to {reply_to!r} dropped: {e}", file=sys.stderr, flush=True)

    def on_request(ch, method, props, body):
        answer = handle(body, props)
        if answer is not None and props.reply_to:
            reply(props.reply_to, answer, props.correlation_id)
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(queue, on_request)
    signal.signal(signal.SIGTERM, lambda *_: channel.stop_consuming())
    print("ready", flush=True)
    channel.start_consuming()
    connection.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
