// The serial console page: xterm.js on a WebSocket to the gateway's /serial path.
// Bytes both ways, in binary messages: the console's output is written to the terminal as
// bytes (xterm.js decodes UTF-8, even split across messages), keystrokes go out as UTF-8.
// Resizing fits the terminal to the window only: a serial line carries no window size;
// the status bar shows the stty command that tells the guest.
(function () {
  "use strict";
  var token = new URLSearchParams(window.location.hash.slice(1)).get("token") || "";
  var statusBar = document.getElementById("status");
  var term = new Terminal({ scrollback: 10000, convertEol: false });
  var fit = new FitAddon.FitAddon();
  var state = "connecting";
  term.loadAddon(fit);
  term.open(document.getElementById("terminal"));
  window.vncgateTerminal = term; // for the tests and for pages that embed this one

  function show() {
    statusBar.textContent = state + " · " + term.cols + "×" + term.rows +
      " (in the guest: stty cols " + term.cols + " rows " + term.rows + ")";
  }
  term.onResize(show);
  window.addEventListener("resize", function () { fit.fit(); });
  fit.fit();
  show();

  var scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  var base = window.location.pathname.replace(/[^/]*$/, "");
  // The token goes as a Sec-WebSocket-Protocol item, in no URL a proxy logs; "binary" is the
  // one the gateway answers.
  var socket = new WebSocket(scheme + "//" + window.location.host + base + "serial",
                             ["binary", "vncgate.token." + token]);
  socket.binaryType = "arraybuffer";
  var encoder = new TextEncoder();
  socket.onopen = function () { state = "connected"; show(); term.focus(); };
  socket.onmessage = function (event) { term.write(new Uint8Array(event.data)); };
  socket.onclose = function () { state = "disconnected"; show(); };
  term.onData(function (data) {
    if (socket.readyState === WebSocket.OPEN) { socket.send(encoder.encode(data)); }
  });
  term.onBinary(function (data) { // raw bytes (mouse reports in some modes): one byte per char
    var bytes = new Uint8Array(data.length);
    for (var i = 0; i < data.length; i++) { bytes[i] = data.charCodeAt(i) & 0xff; }
    if (socket.readyState === WebSocket.OPEN) { socket.send(bytes); }
  });
})();
