"""Print the path of the packaged locustfile (for `locust -f $(python -m ampd_plugin.loadtest.where)`)."""

from ampd_plugin.loadtest import LOCUSTFILE

if __name__ == "__main__":
    print(LOCUSTFILE)
