// vncgate's one addition to noVNC's vnc.html (served ahead of noVNC's modules): the console
// token comes in the page's fragment (#...&token=T), which browsers never send; this hands it to
// the WebSocket that noVNC opens to the page's own host as a Sec-WebSocket-Protocol item
// ("vncgate.token.T", offered with "binary", which the gateway answers), so the token is in no
// request line a proxy logs. A WebSocket to any other host is left as it is.
(function () {
  "use strict";
  var token = new URLSearchParams(window.location.hash.slice(1)).get("token");
  var Native = window.WebSocket;
  if (!token || !Native) { return; }

  function ownHost(url) {
    try { return new URL(url, window.location.href).host === window.location.host; } catch (e) { return false; }
  }

  function GatedWebSocket(url, protocols) {
    if (!ownHost(url)) {
      return protocols === undefined ? new Native(url) : new Native(url, protocols);
    }
    var offered = protocols === undefined ? [] : [].concat(protocols);
    if (offered.indexOf("binary") < 0) { offered.push("binary"); }
    offered.push("vncgate.token." + token);
    return new Native(url, offered);
  }
  GatedWebSocket.prototype = Native.prototype;
  ["CONNECTING", "OPEN", "CLOSING", "CLOSED"].forEach(function (name) { GatedWebSocket[name] = Native[name]; });
  window.WebSocket = GatedWebSocket;
})();
