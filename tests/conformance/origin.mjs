// The cache-tests origin server, bound to loopback only.
//
// node origin.mjs [PORT]   (0 or nothing = a free port chosen by the OS)
//
// The package's own server/server.mjs listens on every interface and writes a pid file
// into the working directory; this launcher reuses its request handlers unchanged and
// listens on 127.0.0.1. Once listening it prints one line to stdout:
//     Listening on http://127.0.0.1:PORT/
import http from 'http'
import process from 'process'

import handleConfig from 'http-cache-tests/server/handle-config.mjs'
import handleFile from 'http-cache-tests/server/handle-file.mjs'
import handleState from 'http-cache-tests/server/handle-state.mjs'
import handleTest from 'http-cache-tests/server/handle-test.mjs'

const port = parseInt(process.argv[2] || '0', 10)
const baseUrl = 'http://localhost/'

// Same dispatch as server/server.mjs's handleMain.
function handleMain (request, response) {
  const url = new URL(request.url, baseUrl)
  const pathSegs = url.pathname.split('/')
  pathSegs.shift()
  const dispatch = pathSegs.shift()
  if (dispatch === 'config') {
    handleConfig(pathSegs, request, response)
  } else if (dispatch === 'test') {
    handleTest(pathSegs, request, response)
  } else if (dispatch === 'state') {
    handleState(pathSegs, request, response)
  } else {
    handleFile(url, request, response)
  }
}

const server = http.createServer(handleMain)
server.on('listening', () => {
  console.log(`Listening on http://127.0.0.1:${server.address().port}/`)
})
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0))
}
server.listen(port, '127.0.0.1')
