"""Samples of `BENCH_ROUNDS` runs, shared by bench/agent.sh and bench/nbd-engine.sh.

Each script writes one line per fio run, "ROUND ROW... PEER IOPS MIB CPU"
(CPU in µs per request, or "-" where it was not measured). A row's peers are
measured in every round; a ratio is taken within its round (both sides
minutes apart at most), and the tables give the median of those ratios.
"""
import collections
import statistics

med = statistics.median


def load(path):
    """{row: {peer: {round: (iops, mib, cpu)}}}, `row` the tuple of fields
    between the round and the peer, in the order first seen; and the rounds."""
    rows = collections.OrderedDict()
    for line in open(path):
        rnd, *row, who, iops, mib, cpu = line.split()
        rows.setdefault(tuple(row), {}).setdefault(who, {})[int(rnd)] = (float(iops), float(mib), cpu)
    rounds = sorted({rnd for r in rows.values() for w in r.values() for rnd in w})
    return rows, rounds


def iops(r, who):
    return med(s[0] for s in r[who].values())


def mib(r, who):
    return med(s[1] for s in r[who].values())


def cpu(r, who):
    return "%.1f" % med(float(s[2]) for s in r[who].values())


def ratios(r, num, den, rounds):
    """The ratio of each round: `den` a peer, or a function of (row, round)."""
    return [r[num][rnd][0] / (den(r, rnd) if callable(den) else r[den][rnd][0]) for rnd in rounds]


def heading(rounds):
    if len(rounds) > 1:
        return f"medians of {len(rounds)} interleaved rounds; each ratio is the median of the rounds' ratios"
    return "one round"
