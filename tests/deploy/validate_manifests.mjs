// Validates rendered Kubernetes overlays offline (no cluster): core objects, the HTTPRoute and
// the ServiceMonitor against their published schemas (kubernetes-models); the InferencePool and
// the endpoint picker's configuration against the fields of gateway-api-inference-extension
// v1.5.0; and that probes, ports, arguments, configuration keys and the picker's metric names
// name what moed really serves (its --help-markdown and a live /metrics scrape).
//
//   node validate_manifests.mjs --help-markdown HELP.md --metrics METRICS.txt OVERLAY.yaml...
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { parseAllDocuments, parse as parseYaml } from 'yaml';

import * as appsV1 from 'kubernetes-models/apps/v1';
import * as coreV1 from 'kubernetes-models/v1';
import * as policyV1 from 'kubernetes-models/policy/v1';
import * as rbacV1 from 'kubernetes-models/rbac.authorization.k8s.io/v1';
import * as gatewayV1 from '@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1';
import * as monitoringV1 from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1';

const args = process.argv.slice(2);
const option = (name) => {
  const i = args.indexOf(name);
  if (i < 0 || i + 1 >= args.length) throw new Error(`missing ${name}`);
  const [value] = args.splice(i, 2).slice(1);
  return value;
};
const helpMarkdown = readFileSync(option('--help-markdown'), 'utf8');
const metricsText = readFileSync(option('--metrics'), 'utf8');
const overlays = args;

// moed's options: the long flag names of `moed --help-markdown`'s table ("| `--name VALUE` |").
const moedOptions = new Set([...helpMarkdown.matchAll(/^\| `--([a-z0-9-]+)/gm)].map((m) => m[1]));
const moedEnv = new Set([...moedOptions].map((o) => `MOED_${o.toUpperCase().replaceAll('-', '_')}`));
// Metric families of the scrape (# TYPE lines) and every sample name.
const metricFamilies = new Set([...metricsText.matchAll(/^# TYPE (\S+) /gm)].map((m) => m[1]));

const schemaValidated = {
  'apps/v1 Deployment': appsV1.Deployment,
  'v1 Service': coreV1.Service,
  'v1 ConfigMap': coreV1.ConfigMap,
  'v1 ServiceAccount': coreV1.ServiceAccount,
  'v1 PersistentVolumeClaim': coreV1.PersistentVolumeClaim,
  'policy/v1 PodDisruptionBudget': policyV1.PodDisruptionBudget,
  'rbac.authorization.k8s.io/v1 Role': rbacV1.Role,
  'rbac.authorization.k8s.io/v1 RoleBinding': rbacV1.RoleBinding,
  'gateway.networking.k8s.io/v1 HTTPRoute': gatewayV1.HTTPRoute,
  'monitoring.coreos.com/v1 ServiceMonitor': monitoringV1.ServiceMonitor,
};

let failures = 0;
const fail = (where, message) => {
  failures += 1;
  console.error(`FAIL ${where}: ${message}`);
};
const check = (where, condition, message) => {
  if (!condition) fail(where, message);
};

// Only these keys, recursively: `shape` maps a key to a nested shape, '*' (any value) or a
// type name. The shapes restate the Go types' JSON names of the pinned extension version.
function checkShape(where, value, shape) {
  if (typeof shape === 'string') {
    if (shape === '*') return;
    const type = Array.isArray(value) ? 'array' : typeof value;
    check(where, type === shape, `expected ${shape}, got ${type}`);
    return;
  }
  if (Array.isArray(shape)) {
    if (!Array.isArray(value)) return fail(where, 'expected a list');
    value.forEach((item, i) => checkShape(`${where}[${i}]`, item, shape[0]));
    return;
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    return fail(where, 'expected an object');
  }
  for (const [key, item] of Object.entries(value)) {
    if (!(key in shape)) fail(where, `unknown field "${key}"`);
    else checkShape(`${where}.${key}`, item, shape[key]);
  }
}

// gateway-api-inference-extension v1.5.0, api/v1/inferencepool_types.go.
const inferencePoolSpec = {
  selector: { matchLabels: '*' },
  targetPorts: [{ number: 'number' }],
  appProtocol: 'string',
  endpointPickerRef: {
    group: 'string',
    kind: 'string',
    name: 'string',
    port: { number: 'number' },
    failureMode: 'string',
  },
};
// v1.5.0: EndpointPickerConfig (apix/config/v1alpha1) and the core-metrics-extractor's
// parameters (pkg/epp/framework/plugins/datalayer/extractor/metrics/factories.go).
const engineConfig = {
  name: 'string',
  queuedRequestsSpec: 'string',
  runningRequestsSpec: 'string',
  kvUsageSpec: 'string',
  loraSpec: 'string',
  cacheInfoSpec: 'string',
  cacheBlockSizeLabelName: 'string',
  cacheNumBlocksLabelName: 'string',
  cacheBlockSizeSpec: 'string',
  cacheNumBlocksSpec: 'string',
};
const pickerConfig = {
  apiVersion: 'string',
  kind: 'string',
  plugins: [{ name: 'string', type: 'string', parameters: '*' }],
  schedulingProfiles: [{ name: 'string', plugins: [{ pluginRef: 'string', weight: 'number' }] }],
  featureGates: ['string'],
  data: '*',
  saturationDetector: '*',
  parser: '*',
};
const v150PluginTypes = new Set([
  'queue-scorer', 'kv-cache-utilization-scorer', 'prefix-cache-scorer', 'lora-affinity-scorer',
  'metrics-data-source', 'core-metrics-extractor', 'max-score-picker', 'random-picker',
  'weighted-random-picker', 'single-profile-handler',
]);

// v1.5.0's EPP flags (pkg/epp/server/options.go, and controller-runtime's zap flags), less the
// metric flags that version refuses in favour of engineConfigs.
const v150EppFlags = new Set([
  'grpc-port', 'ha-enable-leader-election', 'pool-group', 'pool-namespace', 'pool-name',
  'endpoint-selector', 'endpoint-target-ports', 'disable-endpoint-subset-filter',
  'refresh-metrics-interval', 'refresh-prometheus-metrics-interval', 'metrics-staleness-threshold',
  'tracing', 'health-checking', 'metrics-port', 'grpc-health-port', 'enable-pprof', 'cert-path',
  'enable-cert-reload', 'secure-serving', 'metrics-endpoint-auth', 'config-file', 'config-text',
  'zap-devel', 'zap-encoder', 'zap-log-level', 'zap-stacktrace-level', 'zap-time-encoding',
]);

const portOf = (address) => Number(address.split(':').pop());

function checkOverlay(file) {
  const name = basename(file);
  const docs = parseAllDocuments(readFileSync(file, 'utf8')).map((d) => d.toJS());
  const byKind = (kind) => docs.filter((d) => d.kind === kind);
  const find = (kind, objectName) => docs.find((d) => d.kind === kind && d.metadata.name === objectName);

  for (const doc of docs) {
    const where = `${name} ${doc.kind}/${doc.metadata?.name}`;
    const Model = schemaValidated[`${doc.apiVersion} ${doc.kind}`];
    if (Model !== undefined) {
      try {
        new Model(doc).validate();
      } catch (error) {
        fail(where, `schema: ${error.message}`);
      }
    } else if (doc.kind === 'InferencePool') {
      check(where, doc.apiVersion === 'inference.networking.k8s.io/v1', `apiVersion ${doc.apiVersion}`);
      checkShape(where, doc.spec, inferencePoolSpec);
    } else {
      fail(where, `no schema to validate ${doc.apiVersion} ${doc.kind} against`);
    }
  }

  // The model server.
  const deployment = find('Deployment', 'moed');
  const where = `${name} Deployment/moed`;
  if (deployment === undefined) return fail(name, 'no moed Deployment');
  const pod = deployment.spec.template.spec;
  const container = pod.containers.find((c) => c.name === 'moed');
  const ports = Object.fromEntries(container.ports.map((p) => [p.name, p.containerPort]));
  check(where, pod.enableServiceLinks === false, 'enableServiceLinks must be false (MOED_* service variables)');
  // The config file from the ConfigMap the pod mounts.
  const configVolume = pod.volumes.find((v) => v.name === 'config');
  const configMap = find('ConfigMap', configVolume.configMap.name);
  const mount = container.volumeMounts.find((m) => m.name === 'config').mountPath;
  const configArg = container.args[container.args.indexOf('--config') + 1];
  check(where, configArg.startsWith(`${mount}/`), `--config ${configArg} is not under ${mount}`);
  const config = JSON.parse(configMap.data[configArg.slice(mount.length + 1)]);
  for (const key of Object.keys(config)) check(where, moedOptions.has(key), `config key "${key}" is no moed option`);
  for (const arg of container.args) {
    if (arg.startsWith('--')) check(where, moedOptions.has(arg.slice(2).split('=')[0]), `${arg} is no moed flag`);
  }
  for (const env of container.env ?? []) {
    if (env.name.startsWith('MOED_')) check(where, moedEnv.has(env.name), `${env.name} is no moed variable`);
  }
  check(where, ports.grpc === portOf(config.listen), `grpc port ${ports.grpc} != listen ${config.listen}`);
  check(where, ports.http === portOf(config['http-listen']), `http port ${ports.http} != http-listen`);
  check(where, container.startupProbe.grpc.port === ports.grpc, 'startup probe is not the gRPC port');
  check(where, container.livenessProbe.grpc.port === ports.grpc, 'liveness probe is not gRPC health');
  check(where, container.readinessProbe.httpGet.path === '/ready', 'readiness is not GET /ready');
  check(where, ports[container.readinessProbe.httpGet.port] === ports.http, 'readiness is not on the HTTP port');
  const preStop = Number(container.lifecycle.preStop.exec.command.at(-1));
  check(where, pod.terminationGracePeriodSeconds > config['drain-seconds'] + 5 + preStop,
    `grace ${pod.terminationGracePeriodSeconds}s does not cover the drain (${config['drain-seconds']}s + 5 s + ${preStop} s)`);
  check(where, container.livenessProbe.periodSeconds * container.livenessProbe.failureThreshold > config['drain-seconds'],
    'liveness would restart a draining pod');
  const init = pod.initContainers.find((c) => c.name === 'prepare-store');
  const script = init.command.at(-1);
  check(where, script.startsWith(`${mount}/`) && configMap.data[script.slice(mount.length + 1)] !== undefined,
    `init script ${script} is not in the ConfigMap`);
  check(where, configMap.data[script.slice(mount.length + 1)].includes(config.store),
    'the init container does not prepare the store the daemon serves');

  // The Service, and what scrapes it.
  const service = find('Service', 'moed');
  for (const port of service.spec.ports) {
    check(`${name} Service/moed`, ports[port.targetPort] !== undefined, `targetPort ${port.targetPort} is no container port`);
  }
  for (const monitor of byKind('ServiceMonitor')) {
    for (const endpoint of monitor.spec.endpoints) {
      const servicePort = service.spec.ports.find((p) => p.name === endpoint.port);
      check(`${name} ServiceMonitor`, servicePort && ports[servicePort.targetPort] === ports.http,
        `port ${endpoint.port} is not moed's HTTP port`);
      check(`${name} ServiceMonitor`, endpoint.path === '/metrics', `path ${endpoint.path}`);
    }
    for (const [k, v] of Object.entries(monitor.spec.selector.matchLabels)) {
      check(`${name} ServiceMonitor`, service.metadata.labels[k] === v, `selects ${k}=${v}, which the Service lacks`);
    }
  }

  // The inference extension.
  for (const pool of byKind('InferencePool')) {
    const w = `${name} InferencePool/${pool.metadata.name}`;
    const labels = deployment.spec.template.metadata.labels;
    for (const [k, v] of Object.entries(pool.spec.selector.matchLabels)) {
      check(w, labels[k] === v, `selects ${k}=${v}, which moed's pods lack`);
    }
    check(w, pool.spec.targetPorts[0].number === ports.http, 'target port is not moed\'s HTTP port');
    const eppService = find('Service', pool.spec.endpointPickerRef.name);
    check(w, eppService !== undefined, `no endpoint picker Service ${pool.spec.endpointPickerRef.name}`);
    const eppPort = eppService.spec.ports.find((p) => p.port === pool.spec.endpointPickerRef.port.number);
    check(w, eppPort !== undefined, 'the endpoint picker Service has no such port');

    const epp = byKind('Deployment').find((d) => d.metadata.name === eppService.metadata.name);
    const eppContainer = epp.spec.template.spec.containers[0];
    check(w, eppContainer.image.endsWith(':v1.5.0'), `picker image ${eppContainer.image} is not the pinned v1.5.0`);
    const eppArgs = eppContainer.args;
    for (const arg of eppArgs) {
      if (arg.startsWith('--')) check(w, v150EppFlags.has(arg.slice(2).split('=')[0]), `${arg} is no v1.5.0 picker flag`);
    }
    check(w, eppArgs[eppArgs.indexOf('--pool-name') + 1] === pool.metadata.name, '--pool-name is not the pool');
    const configFile = eppArgs[eppArgs.indexOf('--config-file') + 1];
    const eppMount = eppContainer.volumeMounts.find((m) => configFile.startsWith(`${m.mountPath}/`));
    const eppConfigMap = find('ConfigMap', epp.spec.template.spec.volumes.find((v) => v.name === eppMount.name).configMap.name);
    const text = eppConfigMap.data[configFile.slice(eppMount.mountPath.length + 1)];
    check(w, text !== undefined, `${configFile} is not in the picker's ConfigMap`);
    const picker = parseYaml(text);
    const pw = `${name} EndpointPickerConfig`;
    checkShape(pw, picker, pickerConfig);
    check(pw, picker.apiVersion === 'inference.networking.x-k8s.io/v1alpha1' && picker.kind === 'EndpointPickerConfig',
      `${picker.apiVersion} ${picker.kind}`);
    const pluginNames = new Set(picker.plugins.map((p) => p.name ?? p.type));
    for (const plugin of picker.plugins) check(pw, v150PluginTypes.has(plugin.type), `unknown plugin type ${plugin.type}`);
    for (const profile of picker.schedulingProfiles) {
      for (const ref of profile.plugins) check(pw, pluginNames.has(ref.pluginRef), `pluginRef ${ref.pluginRef} names no plugin`);
    }
    const source = picker.plugins.find((p) => p.type === 'metrics-data-source');
    check(pw, source?.parameters?.path === '/metrics', 'metrics are not read from /metrics');
    const extractor = picker.plugins.find((p) => p.type === 'core-metrics-extractor');
    checkShape(`${pw} core-metrics-extractor`, extractor.parameters,
      { engineLabelKey: 'string', defaultEngine: 'string', engineConfigs: [engineConfig] });
    const engine = extractor.parameters.engineConfigs.find((e) => e.name === extractor.parameters.defaultEngine);
    check(pw, engine !== undefined, 'defaultEngine names no engineConfig');
    const expected = {
      queuedRequestsSpec: 'moed_num_requests_waiting',
      runningRequestsSpec: 'moed_num_requests_running',
      kvUsageSpec: 'moed_kv_cache_usage_perc',
    };
    for (const [field, metric] of Object.entries(expected)) {
      check(pw, engine[field] === metric, `${field} is ${engine[field]}, not ${metric}`);
      check(pw, metricFamilies.has(engine[field]), `${engine[field]} is not in moed's /metrics`);
    }
    for (const route of byKind('HTTPRoute')) {
      const refs = route.spec.rules.flatMap((r) => r.backendRefs);
      check(`${name} HTTPRoute`, refs.some((r) => r.kind === 'InferencePool' && r.name === pool.metadata.name),
        'no backendRef to the pool');
    }
  }
  console.log(`${name}: ${docs.length} objects checked`);
}

for (const file of overlays) checkOverlay(file);
if (failures > 0) {
  console.error(`${failures} problem(s)`);
  process.exit(1);
}
