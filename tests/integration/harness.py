"""The integration suites' runner: a registry of test functions, a
decorator that runs one test against each legacy upstream, and the main
loop that prints "ok"/"FAIL" per test and ends with "N passed, M failed"
(the line tests/run-checks.sh reads).

    suite = harness.Suite()
    @suite.test
    def some_test(): ...
    @suite.both(UPSTREAMS)      # some_test[dovecot], some_test[courier]
    def other(up): ...
    sys.exit(suite.main())      # names given on the command line filter
"""
import sys
import time
import traceback


class Pending(Exception):
    """Raised by a test whose feature is not offered yet: reported as
    "pend", counted neither passed nor failed."""


class Suite:
    def __init__(self):
        self.tests = []

    def test(self, fn):
        self.tests.append(fn)
        return fn

    def both(self, upstreams):
        """The decorated test(up) runs once per upstream name."""
        def deco(fn):
            for up in upstreams:
                def run(up=up):
                    fn(up)
                run.__name__ = "%s[%s]" % (fn.__name__, up)
                self.tests.append(run)
            return fn
        return deco

    def main(self, argv=None):
        passed = failed = pending = 0
        only = sys.argv[1:] if argv is None else argv
        for t in self.tests:
            if only and not any(o in t.__name__ for o in only):
                continue
            t0 = time.time()
            try:
                t()
                passed += 1
                print("ok   %s (%.1fs)" % (t.__name__, time.time() - t0))
            except Pending as e:
                pending += 1
                print("pend %s: %s" % (t.__name__, e))
            except Exception:
                failed += 1
                print("FAIL %s" % t.__name__)
                traceback.print_exc(limit=4)
            sys.stdout.flush()
        if pending:
            print("%d pending (not offered yet; neither passed nor failed)" % pending)
        print("%d passed, %d failed" % (passed, failed))
        return 1 if failed else 0


def check_known(name, fn, known=None, tb_limit=2):
    """Run test fn (no arguments) named name; known is the reason it is a
    known failure (XFAIL: reported, not counted) or None. Prints the
    result line; returns "pass", "xfail" or "fail"."""
    try:
        fn()
        print("%s %s" % ("XPASS" if known else "ok  ", name))
        return "pass"
    except Exception:
        if known:
            print("XFAIL %s: %s" % (name, known))
            traceback.print_exc(limit=0)
            return "xfail"
        print("FAIL %s" % name)
        traceback.print_exc(limit=tb_limit)
        return "fail"
    finally:
        sys.stdout.flush()
