"""A long task's log lines reach the driver as it runs, then its result; its failure is raised."""

import logging

import pytest
import ray

from jobs.common import reporting

LOGGER = "dermaray.test.reporting"


def _work() -> int:
    for step in (1, 2, 3):
        logging.getLogger(LOGGER).info("step %d/3", step)
    logging.getLogger(LOGGER).debug("below INFO")
    logging.getLogger("dermaray.test.other").info("not this logger's")
    return 42


def test_records_then_the_result_and_the_logger_is_left_as_it_was():
    logging.getLogger("dermaray.test.other").setLevel(logging.INFO)  # emitted, but by another logger
    assert logging.getLogger(LOGGER).level == logging.NOTSET  # WARNING through the root: INFO would not be emitted
    assert list(reporting(_work, LOGGER)) == [("log", "step 1/3"), ("log", "step 2/3"), ("log", "step 3/3"), ("result", 42)]
    assert not logging.getLogger(LOGGER).handlers and logging.getLogger(LOGGER).level == logging.NOTSET


def test_a_failure_in_the_work_is_raised_where_the_items_are_read():
    def fails() -> None:
        logging.getLogger(LOGGER).info("before")
        raise ValueError("no base")

    items = reporting(fails, LOGGER)
    assert next(items) == ("log", "before")
    with pytest.raises(ValueError, match="no base"):
        next(items)
    assert not logging.getLogger(LOGGER).handlers


def test_a_streaming_task_shows_them_on_the_driver_as_they_come(ray_cluster):
    @ray.remote(num_returns="streaming", max_calls=1)
    def task():
        yield from reporting(_work, LOGGER)

    assert [ray.get(ref) for ref in task.remote()][-2:] == [("log", "step 3/3"), ("result", 42)]
