// Run the cache-tests suite (as the package's cli.mjs does) against a proxy.
//
// node client.mjs BASE_URL [TEST_ID[,TEST_ID...]] [--dump]
//
// Prints one JSON document to stdout:
//   {"results": {id: true | [errorName, message]}, "tests": [{id, name, kind, suite,
//    suite_name, depends_on, requests}]}
// where "tests" lists every test the CLI runs (browser_only tests are left out, as the
// CLI leaves them out), including the surrogate-control suite, as cache-tests.fyi counts.
// With TEST_IDs, runs only those tests ("results" has only them; "tests" still lists all).
// With --dump: the package's request/response log for the tests run, then one line
// "==== Result: ..." per test, instead of JSON.
import fetch from 'node-fetch'
import process from 'process'

import { runTests, getResults } from 'http-cache-tests/client/runner.mjs'
import tests from 'http-cache-tests/tests/index.mjs'
import surrogate from 'http-cache-tests/tests/surrogate-control.mjs'

tests.push(surrogate)

const args = process.argv.slice(2)
const dump = args.includes('--dump')
const positional = args.filter(arg => arg !== '--dump')
const baseUrl = (positional[0] || '').replace(/\/+$/, '')
const testIds = positional[1] ? positional[1].split(',') : []
if (!baseUrl) {
  console.error('usage: node client.mjs BASE_URL [TEST_ID[,TEST_ID...]] [--dump]')
  process.exit(2)
}

function describe () {
  const out = []
  for (const suite of tests) {
    for (const test of suite.tests) {
      if (test.browser_only === true) continue
      out.push({
        id: test.id,
        name: test.name,
        kind: test.kind || 'required',
        suite: suite.id,
        suite_name: suite.name,
        depends_on: test.depends_on || [],
        requests: JSON.parse(JSON.stringify(test.requests))
      })
    }
  }
  return out
}

// Capture the test metadata before running: the runner mutates request configs.
const described = describe()

let testsToRun = tests
if (testIds.length) {
  testsToRun = []
  const found = new Set()
  for (const suite of tests) {
    const selected = suite.tests.filter(test => testIds.includes(test.id))
    selected.forEach(test => found.add(test.id))
    if (selected.length) testsToRun.push({ name: suite.name, id: suite.id, tests: selected })
  }
  const unknown = testIds.filter(id => !found.has(id))
  if (unknown.length) {
    console.error(`no test with id ${unknown.join(', ')}`)
    process.exit(2)
  }
}
if (dump) {
  testsToRun.forEach(suite => suite.tests.forEach(test => { test.dump = true }))
}

runTests(testsToRun, fetch, false, baseUrl)
  .then(() => {
    const results = getResults()
    if (dump) {
      for (const [id, result] of Object.entries(results)) {
        console.log(`==== Result ${id}: ${JSON.stringify(result)}`)
      }
    } else {
      process.stdout.write(JSON.stringify({ results, tests: described }) + '\n')
    }
  })
  .catch(err => {
    console.error(err)
    process.exit(1)
  })
