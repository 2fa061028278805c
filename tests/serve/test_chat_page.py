"""The chat page at GET / in headless Chromium (Debian's `chromium`), driven over the DevTools protocol
on a pipe (--remote-debugging-pipe: JSON messages ended by NUL on fds 3 and 4, no extra package): type a
question, press Enter, watch the answer stream in, keep a screenshot."""

import base64
import json
import os
import queue
import shutil
import subprocess
import threading
import time

import pytest
from serve_fixtures import client_for, running_server, serve_root, tiny_ckpt  # noqa: F401
from test_robustness import slow_down

pytest.importorskip("fastapi")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")


class DevTools:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe."""

    def __init__(self, user_dir):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_fds():  # in the child: fd 3 reads our commands, fd 4 writes its replies
            read_end, write_end = os.dup(to_child_r), os.dup(from_child_w)  # safe even if either is 3 or 4
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--remote-debugging-pipe", f"--user-data-dir={user_dir}", "--window-size=1000,700",
             "about:blank"], preexec_fn=wire_fds, pass_fds=(3, 4, to_child_r, from_child_w),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\0" in buffer:
                message, buffer = buffer.split(b"\0", 1)
                self._replies.put(json.loads(message))

    def call(self, method: str, session: str | None = None, timeout: float = 20.0, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply = self._replies.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]
        raise AssertionError(f"{method}: no answer from chromium within {timeout}s")

    def close(self):
        self.proc.kill()
        self.proc.wait(timeout=10)
        os.close(self._to_child)
        os.close(self._from_child)


def evaluate(tools: DevTools, session: str, expression: str):
    result = tools.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
    return result["result"].get("value")


def test_the_chat_page_streams_an_answer(tiny_ckpt, tmp_path):  # noqa: F811
    question = "Who is Hamlet?"
    with running_server(tiny_ckpt, slots=2) as server:
        want = client_for(server).chat.completions.create(
            model="ckpt", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=40)
        slow_down(server, 0.03)  # 40 tokens over >= 1.2 s: the page must show partial answers on the way
        tools = DevTools(tmp_path / "chromium-profile")
        try:
            target = tools.call("Target.createTarget", url=server.url + "/")["targetId"]
            session = tools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not evaluate(
                    tools, session, "document.readyState === 'complete' && document.getElementById('model')"
                                    ".textContent.startsWith('ckpt')"):
                time.sleep(0.05)
            assert evaluate(tools, session, "document.getElementById('model').textContent").startswith("ckpt")
            # the sampling settings at hand: greedy, 40 tokens
            evaluate(tools, session, "document.getElementById('temperature').value = '0';"
                                     "document.getElementById('max_tokens').value = '40'")
            evaluate(tools, session, "document.getElementById('question').focus()")
            tools.call("Input.insertText", session, text=question)
            for kind in ("keyDown", "keyUp"):
                tools.call("Input.dispatchKeyEvent", session, type=kind, key="Enter", code="Enter",
                           windowsVirtualKeyCode=13)
            seen, done = [], False
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not done:
                state = evaluate(tools, session, "(() => { const a = document.querySelector('.msg.assistant');"
                                 " return a ? [a.firstChild ? a.firstChild.textContent : '',"
                                 " a.classList.contains('done')] : null })()")
                if state is not None:
                    text, done = state
                    if text and (not seen or seen[-1] != text):
                        seen.append(text)
                time.sleep(0.02)
            assert done, seen
            shot = tools.call("Page.captureScreenshot", session, format="png")["data"]
            (tmp_path / "chat_page.png").write_bytes(base64.b64decode(shot))
            if os.environ.get("GLM_SCREENSHOT_DIR"):
                shutil.copy(tmp_path / "chat_page.png", os.environ["GLM_SCREENSHOT_DIR"])
            user = evaluate(tools, session, "document.querySelector('.msg.user').textContent")
        finally:
            tools.close()
    answer = want.choices[0].message.content
    assert user == question
    assert seen[-1] == answer  # the streamed page shows the API's greedy answer, exactly
    assert len(seen) >= 3 and all(answer.startswith(partial) for partial in seen)  # it grew in several steps
    assert (tmp_path / "chat_page.png").stat().st_size > 5000
