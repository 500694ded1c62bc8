"""Send ten tasks, then wait for a worker to run them.

Start a worker in another terminal, from this directory:

    conveyor worker tasks:app
"""

from tasks import add


def main() -> None:
    """Send, then print each result as it arrives."""
    results = [add.delay(n, n) for n in range(10)]
    print(f"sent {len(results)} tasks; waiting up to 60 s for a worker")
    for result in results:
        print(f"{result.id}: {result.get(timeout=60)}")


if __name__ == "__main__":
    main()
