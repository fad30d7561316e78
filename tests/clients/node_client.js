#!/usr/bin/env node
// nodemngr interoperability check with the npm `xmlrpc` package (installed in this folder by
// `npm ci`, see package.json). Usage: node node_client.js URL
// Prints OK and exits 0, or prints what failed and exits 1.
'use strict';

const path = require('path');
const xmlrpc = require(path.join(__dirname, 'node', 'node_modules', 'xmlrpc'));

const url = process.argv[2];
if (!url) {
  console.log('usage: node_client.js URL');
  process.exit(1);
}
const client = url.startsWith('https:') ? xmlrpc.createSecureClient(url) : xmlrpc.createClient(url);

function call(method, params) {
  return new Promise((resolve, reject) => {
    client.methodCall(method, params, (err, value) => (err ? reject(err) : resolve(value)));
  });
}

let failed = false;
function fail(msg) {
  console.log('FAIL: ' + msg);
  failed = true;
}

async function main() {
  // 1. newPort with a string info
  const p1 = await call('newPort', ['node client']);
  if (!Number.isInteger(p1)) throw new Error('newPort(string) returned ' + JSON.stringify(p1) + ', not an int');
  console.log(p1);

  // 2. newPort with a struct info
  const p2 = await call('newPort', [{ service: 'echo', n: 3 }]);
  if (!Number.isInteger(p2)) throw new Error('newPort(struct) returned ' + JSON.stringify(p2) + ', not an int');
  console.log(p2);
  if (p1 === p2) fail('newPort gave the same port twice: ' + p1);

  // 3. listPorts shows both, with their info
  const list = await call('listPorts', []);
  if (!Array.isArray(list)) throw new Error('listPorts returned ' + JSON.stringify(list) + ', not an array');
  const e1 = list.find((e) => e.port === p1);
  const e2 = list.find((e) => e.port === p2);
  if (!e1) fail('port ' + p1 + ' missing from listPorts');
  else if (e1.info !== 'node client') fail('port ' + p1 + ' info is ' + JSON.stringify(e1.info));
  if (!e2) fail('port ' + p2 + ' missing from listPorts');
  else if (!e2.info || e2.info.service !== 'echo' || e2.info.n !== 3 || Object.keys(e2.info).length !== 2) {
    fail('port ' + p2 + ' info is ' + JSON.stringify(e2.info) + ', not {service: echo, n: 3}');
  }
  for (const e of [e1, e2].filter(Boolean)) {
    for (const k of ['port', 'name', 'info', 'pid', 'since']) {
      if (!(k in e)) fail('listPorts entry for ' + e.port + " has no '" + k + "'");
    }
    if (!Number.isInteger(e.pid)) fail('pid of ' + e.port + ' is ' + JSON.stringify(e.pid) + ', not an int');
    if (!(e.since instanceof Date) || isNaN(e.since.getTime())) fail('since of ' + e.port + ' is not a dateTime');
  }
  const ports = list.map((e) => e.port);
  const sorted = ports.slice().sort((a, b) => a - b);
  if (ports.join(',') !== sorted.join(',')) fail('listPorts is not sorted by port: ' + ports.join(','));
  if (e2 && e2.name !== '') fail('listPorts entry for ' + p2 + ' has name ' + JSON.stringify(e2.name) + ', not ""');

  // 3b. lookup by name: the string info is the name; an unknown name is an empty array
  const found = await call('lookup', ['node client']);
  if (!Array.isArray(found) || found.length !== 1 || found[0].port !== p1 || found[0].name !== 'node client') {
    fail("lookup('node client') is " + JSON.stringify(found) + ', not one entry for port ' + p1);
  }
  const none = await call('lookup', ['no such node name']);
  if (!Array.isArray(none) || none.length !== 0) fail('lookup of an unknown name is ' + JSON.stringify(none) + ', not []');
  try {
    await call('lookup', [7]);
    fail('lookup(7) did not fault');
  } catch (err) {
    if (err.faultCode === undefined) throw err;
    if (err.faultCode !== 3) fail('lookup(7) fault code is ' + JSON.stringify(err.faultCode) + ', not 3');
  }

  // 4. delPort of a port not registered: fault code 1
  try {
    const r = await call('delPort', [1]);
    fail('delPort(1) did not fault, returned ' + JSON.stringify(r));
  } catch (err) {
    if (err.faultCode === undefined) throw err;
    if (err.faultCode !== 1) fail('delPort(1) fault code is ' + JSON.stringify(err.faultCode) + ', not the number 1');
    if (!/Node manager: Unknown port: 1\b/.test(String(err.faultString))) {
      fail('delPort(1) fault string is ' + JSON.stringify(err.faultString));
    }
  }

  // 5. give both ports back
  for (const p of [p1, p2]) {
    const r = await call('delPort', [p]);
    if (r !== 0) fail('delPort(' + p + ') returned ' + JSON.stringify(r) + ', not 0');
  }
}

main().then(
  () => {
    if (failed) process.exit(1);
    console.log('OK');
    process.exit(0);
  },
  (err) => {
    fail(err.faultCode !== undefined ? 'unexpected fault ' + err.faultCode + ': ' + err.faultString : String(err && err.stack || err));
    process.exit(1);
  }
);
