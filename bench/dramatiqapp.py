"""Dramatiq broker and actor for the comparison: as the peer harness's sys_dramatiq.py (library
defaults, no retries), broker from BENCH_BROKER_URL, queue ``bench-dramatiq``."""
import common
import dramatiq

if common.BROKER_URL.startswith("redis"):
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=common.BROKER_URL)
else:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=common.BROKER_URL)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=common.DRAMATIQ_QUEUE, max_retries=0)
def noop(ts=None, sleep=0.0):
    common.body(ts, sleep)


def enqueue(**kw):
    noop.send(**kw)
