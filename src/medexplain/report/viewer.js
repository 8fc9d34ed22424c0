/* medexplain report viewer: maps over an image, drawn on canvases from 8-bit arrays
   embedded in the page (no network, no library). 3D: three orthogonal slice views with a
   slider each, a crosshair (click a view to move it) and orientation letters; 2D: one view.
   Controls: method, group (the group maps of a method share one scale; a single image's
   map is drawn over that image on its own scale), overlay opacity (times the value's
   fraction of the scale, so weak values leave the image visible), threshold (fraction of
   the scale). */
(function () {
  "use strict";
  function bytes(b64) {
    var text = atob(b64), out = new Uint8Array(text.length);
    for (var i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
    return out;
  }
  function option(select, value) {
    var o = document.createElement("option");
    o.value = value; o.textContent = value; select.appendChild(o);
  }
  function Viewer(root, data) {
    this.root = root; this.data = data;
    this.shape = data.shape;
    this.background = bytes(data.background);
    this.luts = { seq: bytes(data.luts.seq), div: bytes(data.luts.div) };
    this.cache = {};
    this.pos = this.shape.map(function (n) { return Math.floor(n / 2); });
    if (data.cut) this.pos = data.cut.slice();
    this.q = function (id) { return root.querySelector("[data-role='" + id + "']"); };
    this.build();
  }
  Viewer.prototype.build = function () {
    var self = this, data = this.data;
    var method = this.q("method"), group = this.q("group");
    Object.keys(data.methods).forEach(function (m) { option(method, m); });
    method.value = data.initial.method;
    method.addEventListener("change", function () { self.fillGroups(); self.draw(); });
    group.addEventListener("change", function () { self.draw(); });
    this.fillGroups();
    group.value = data.initial.group in data.methods[method.value].groups
      ? data.initial.group : group.options[0].value;
    ["opacity", "threshold"].forEach(function (id) {
      self.q(id).addEventListener("input", function () { self.draw(); });
    });
    this.views = data.views.map(function (view) {
      var box = document.createElement("div"); box.className = "mx-view";
      var canvas = document.createElement("canvas");
      canvas.setAttribute("data-view", view.name);
      canvas.title = view.name;
      box.appendChild(canvas);
      var v = { spec: view, canvas: canvas, slider: null };
      if (view.axis !== null) {
        var label = document.createElement("label");
        label.textContent = view.name + " ";
        var slider = document.createElement("input");
        slider.type = "range"; slider.min = 0; slider.max = self.shape[view.axis] - 1;
        slider.value = self.pos[view.axis];
        slider.setAttribute("data-slider", view.name);
        slider.addEventListener("input", function () {
          self.pos[view.axis] = parseInt(slider.value, 10); self.draw();
        });
        label.appendChild(slider); box.appendChild(label); v.slider = slider;
        canvas.addEventListener("click", function (event) { self.click(v, event); });
      }
      self.q("views").appendChild(box);
      return v;
    });
    this.draw();
  };
  Viewer.prototype.fillGroups = function () {
    var group = this.q("group"), before = group.value;
    var groups = this.data.methods[this.q("method").value].groups;
    group.innerHTML = "";
    Object.keys(groups).forEach(function (g) { option(group, g); });
    if (before && before in groups) group.value = before;
  };
  Viewer.prototype.group = function () {
    return this.data.methods[this.q("method").value].groups[this.q("group").value];
  };
  Viewer.prototype.map = function () {
    var m = this.q("method").value, g = this.q("group").value, key = m + "\u0000" + g;
    if (!(key in this.cache)) this.cache[key] = bytes(this.group().data);
    return this.cache[key];
  };
  /* A single image's entry is drawn over that image; group maps over the mean image. */
  Viewer.prototype.image = function () {
    var name = this.group().background;
    if (!name) return this.background;
    var key = "image\u0000" + name;
    if (!(key in this.cache)) this.cache[key] = bytes(this.data.backgrounds[name]);
    return this.cache[key];
  };
  /* In-plane axes of a view: columns run along u (left to right), rows along v (bottom to
     top), as radiologists view RAS slices (anterior or superior up). */
  Viewer.prototype.plane = function (view) {
    if (view.axis === null) return null;
    var axes = [0, 1, 2].filter(function (a) { return a !== view.axis; });
    return { u: axes[0], v: axes[1] };
  };
  Viewer.prototype.index = function (x, y, z) {
    var s = this.shape;
    return (x * s[1] + y) * s[2] + z;
  };
  Viewer.prototype.draw = function () {
    var self = this, method = this.data.methods[this.q("method").value];
    var values = this.map(), lut = method.signed ? this.luts.div : this.luts.seq;
    var opacity = parseFloat(this.q("opacity").value);
    var threshold = parseFloat(this.q("threshold").value);
    this.q("opacity-value").textContent = opacity.toFixed(2);
    this.q("threshold-value").textContent = (threshold * this.group().scale).toPrecision(3);
    var rgb = this.data.rgb, bg = this.image();
    this.views.forEach(function (v) {
      var plane = self.plane(v.spec), w, h, at;
      if (plane === null) {
        h = self.shape[0]; w = self.shape[1];
        at = function (c, r) { return r * w + c; };
      } else {
        w = self.shape[plane.u]; h = self.shape[plane.v];
        at = function (c, r) {
          var p = self.pos.slice(); p[plane.u] = c; p[plane.v] = h - 1 - r;
          return self.index(p[0], p[1], p[2]);
        };
      }
      var image = new ImageData(w, h), px = image.data;
      for (var r = 0; r < h; r++) {
        for (var c = 0; c < w; c++) {
          var i = at(c, r), o = 4 * (r * w + c), q = values[i];
          var red, green, blue;
          if (rgb) { red = bg[3 * i]; green = bg[3 * i + 1]; blue = bg[3 * i + 2]; }
          else { red = green = blue = bg[i]; }
          var strength = method.signed ? Math.abs(q - 127.5) / 127.5 : q / 255;
          if (strength > 0 && strength >= threshold) {
            var alpha = opacity * Math.min(1, strength);
            red = (1 - alpha) * red + alpha * lut[3 * q];
            green = (1 - alpha) * green + alpha * lut[3 * q + 1];
            blue = (1 - alpha) * blue + alpha * lut[3 * q + 2];
          }
          px[o] = red; px[o + 1] = green; px[o + 2] = blue; px[o + 3] = 255;
        }
      }
      self.paint(v, image, plane);
    });
  };
  Viewer.prototype.paint = function (v, image, plane) {
    var scale = Math.max(1, Math.floor(this.data.display / Math.max(image.width, image.height)));
    var canvas = v.canvas, ctx = canvas.getContext("2d");
    canvas.width = image.width * scale; canvas.height = image.height * scale;
    var buffer = document.createElement("canvas");
    buffer.width = image.width; buffer.height = image.height;
    buffer.getContext("2d").putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(buffer, 0, 0, canvas.width, canvas.height);
    if (plane === null) return;
    var col = (this.pos[plane.u] + 0.5) * scale;
    var row = (image.height - 1 - this.pos[plane.v] + 0.5) * scale;
    ctx.strokeStyle = "rgba(0,255,0,0.7)"; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(col, 0); ctx.lineTo(col, canvas.height);
    ctx.moveTo(0, row); ctx.lineTo(canvas.width, row); ctx.stroke();
    var letters = this.data.letters, pad = 4;
    ctx.fillStyle = "#ffde59"; ctx.font = "bold 13px sans-serif";
    ctx.textBaseline = "middle"; ctx.textAlign = "left";
    ctx.fillText(letters[plane.u][0], pad, canvas.height / 2);
    ctx.textAlign = "right";
    ctx.fillText(letters[plane.u][1], canvas.width - pad, canvas.height / 2);
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    ctx.fillText(letters[plane.v][1], canvas.width / 2, pad);
    ctx.textBaseline = "bottom";
    ctx.fillText(letters[plane.v][0], canvas.width / 2, canvas.height - pad);
    canvas.setAttribute("data-slice", String(this.pos[v.spec.axis]));
  };
  Viewer.prototype.click = function (v, event) {
    var plane = this.plane(v.spec), rect = v.canvas.getBoundingClientRect();
    var w = this.shape[plane.u], h = this.shape[plane.v];
    var c = Math.floor((event.clientX - rect.left) / rect.width * w);
    var r = Math.floor((event.clientY - rect.top) / rect.height * h);
    this.pos[plane.u] = Math.min(w - 1, Math.max(0, c));
    this.pos[plane.v] = Math.min(h - 1, Math.max(0, h - 1 - r));
    var self = this;
    this.views.forEach(function (other) {
      if (other.slider) other.slider.value = self.pos[other.spec.axis];
    });
    this.draw();
  };
  document.querySelectorAll("[data-mx-viewer]").forEach(function (root) {
    if (root.mxViewer) return;
    var data = JSON.parse(root.querySelector("script[type='application/json']").textContent);
    root.mxViewer = new Viewer(root, data);
  });
})();
