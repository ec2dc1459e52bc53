from twisted.application.service import ServiceMaker

callme = ServiceMaker(
    "txcallme", "txcallme.tap", "Serve Python functions over AMQP (callme RPC).", "callme"
)
