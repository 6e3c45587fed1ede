"""huey for the comparison: as the peer harness's sys_huey.py (RedisHuey with its default blocking
BRPOP), on the Redis broker database."""
import common
from huey import RedisHuey

huey = RedisHuey(common.HUEY_NAME, url=common.BROKER_URL)


@huey.task()
def noop(ts=None, sleep=0.0):
    common.body(ts, sleep)


def enqueue(**kw):
    noop(**kw)
