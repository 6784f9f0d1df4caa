{{/*
Names. Every object is <fullname>-<part>; the release name is the prefix (at most 40 characters so that
<fullname>-gateway-controller and the dask-gateway objects derived from the instance name fit in 63).
*/}}
{{- define "workbench.fullname" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "workbench.name" -}}
{{- printf "%s-%s" (include "workbench.fullname" .root) .part -}}
{{- end -}}

{{/* The dask-gateway instance: the gateway.dask.org/instance label of its clusters, pods and routes. */}}
{{- define "workbench.gatewayInstance" -}}
{{- printf "%s-gateway" (include "workbench.fullname" .) -}}
{{- end -}}

{{- define "workbench.secretName" -}}
{{- printf "%s-secrets" (include "workbench.fullname" .) -}}
{{- end -}}

{{/* Labels: selectorLabels (stable) for selectors and NetworkPolicies; labels for metadata. */}}
{{- define "workbench.selectorLabels" -}}
app.kubernetes.io/name: workbench
app.kubernetes.io/instance: {{ .root.Release.Name | quote }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "workbench.labels" -}}
{{ include "workbench.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Labels of notebook pods (set by the hub's KubeSpawner: workbench.kubernetes.hub.singleuser_labels). */}}
{{- define "workbench.singleuserSelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/component: singleuser-server
{{- end -}}

{{/* Labels of notebook job pods (set by workbench.jobs.kube from the notebook pod's). */}}
{{- define "workbench.notebookJobSelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/component: notebook-job
{{- end -}}

{{/* Labels of dask-gateway's pods (set by dask-gateway itself) of this release's gateway. */}}
{{- define "workbench.daskSelectorLabels" -}}
gateway.dask.org/instance: {{ include "workbench.gatewayInstance" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Images. */}}
{{- define "workbench.ownImage" -}}
{{- $img := index .root.Values.images .name -}}
{{- $tag := $img.tag | default .root.Values.images.tag | default .root.Chart.AppVersion -}}
{{- printf "%s/%s:%s" (.root.Values.images.registry | trimSuffix "/") $img.repository $tag -}}
{{- end -}}

{{- define "workbench.upstreamImage" -}}
{{- $img := index .root.Values.images .name -}}
{{- if $img.registry -}}
{{- printf "%s/%s:%s" ($img.registry | trimSuffix "/") $img.repository $img.tag -}}
{{- else -}}
{{- printf "%s:%s" $img.repository $img.tag -}}
{{- end -}}
{{- end -}}

{{- define "workbench.imagePullSecrets" -}}
{{- range .Values.images.pullSecrets }}
- name: {{ if kindIs "string" . }}{{ . }}{{ else }}{{ .name }}{{ end }}
{{- end }}
{{- end -}}

{{- define "workbench.pullSecretNames" -}}
{{- $names := list -}}
{{- range .Values.images.pullSecrets }}{{ if kindIs "string" . }}{{ $names = append $names . }}{{ else }}{{ $names = append $names .name }}{{ end }}{{ end -}}
{{- join "," $names -}}
{{- end -}}

{{/*
The effective platform policy, as JSON: .Values.platform, or the built-in try-out policy when it is
empty. JSON keeps numbers exact (YAML output would write 1000000 as 1e+06).
*/}}
{{- define "workbench.platform" -}}
{{- if .Values.platform -}}
{{- toJson .Values.platform -}}
{{- else -}}
{{- tpl (.Files.Get "files/try-out-platform.yaml") . | fromYaml | toJson -}}
{{- end -}}
{{- end -}}

{{- define "workbench.usesTryOut" -}}
{{- if not .Values.platform }}true{{ end -}}
{{- end -}}

{{- define "workbench.authType" -}}
{{- $p := include "workbench.platform" . | fromJson -}}
{{- (($p.auth | default dict).type | default "demo") -}}
{{- end -}}

{{/* Demo auth is accepted when the proxy is not exposed (ClusterIP, no Ingress) or explicitly allowed. */}}
{{- define "workbench.demoAuthAccepted" -}}
{{- if or .Values.demoAuth.allowExposed (and (eq .Values.proxy.service.type "ClusterIP") (not .Values.ingress.enabled)) }}true{{ end -}}
{{- end -}}

{{- define "workbench.createClaims" -}}
{{- $create := .Values.storage.createClaims -}}
{{- if kindIs "invalid" $create -}}
{{- include "workbench.usesTryOut" . -}}
{{- else if $create -}}
true
{{- end -}}
{{- end -}}

{{/* Pod and container security contexts of the chart's own components. */}}
{{- define "workbench.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "workbench.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* A 64-character hex secret (32 random bytes' worth of entropy; sha256 of 64 random characters). */}}
{{- define "workbench.randHex" -}}
{{- randAlphaNum 64 | sha256sum -}}
{{- end -}}

{{/*
The Secret's data, base64-encoded, key by key: a value in .Values.secrets wins; else the value in the
release's existing Secret (lookup: kept across helm upgrade); else a new random one. `helm template`
cannot lookup, so it generates new ones each time unless .Values.secrets gives them.
*/}}
{{- define "workbench.secretData" -}}
{{- /* computed once per render (cached in .Values): the Secret and every checksum/secret must agree */ -}}
{{- if not (hasKey .Values "_workbenchSecretData") -}}
{{- $_ := set .Values "_workbenchSecretData" (include "workbench.secretDataOnce" .) -}}
{{- end -}}
{{- index .Values "_workbenchSecretData" -}}
{{- end -}}

{{/* checksum/secret of the pods that read the release's Secret (z2jh's checksum/secret): a changed key
rolls the hub, its proxy and the services together, so that they never disagree on a token. */}}
{{- define "workbench.secretChecksum" -}}
checksum/secret: {{ include "workbench.secretData" . | sha256sum }}
{{- end -}}

{{- define "workbench.secretDataOnce" -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "workbench.secretName" .) -}}
{{- $previous := dict -}}
{{- if $existing }}{{ $previous = $existing.data | default dict }}{{ end -}}
{{- $keys := dict "cookie-secret" .Values.secrets.cookieSecret "proxy-token" .Values.secrets.proxyToken "crypt-key" .Values.secrets.cryptKey "gateway-api-token" .Values.secrets.gatewayApiToken "guard-cookie-secret" .Values.secrets.guardCookieSecret -}}
{{- if .Values.quota.enabled -}}
{{- $_ := set $keys "quota-api-token" .Values.secrets.quotaApiToken -}}
{{- end -}}
{{- if .Values.sessions.enabled -}}
{{- $_ := set $keys "sessions-api-token" .Values.secrets.sessionsApiToken -}}
{{- else -}}
{{- $_ := set $keys "culler-api-token" .Values.secrets.cullerApiToken -}}
{{- end -}}
{{- if include "workbench.rostersEnabled" . -}}
{{- $_ := set $keys "rosters-api-token" .Values.secrets.rostersApiToken -}}
{{- end -}}
{{- if .Values.jobs.enabled -}}
{{- $_ := set $keys "jobs-api-token" .Values.secrets.jobsApiToken -}}
{{- end -}}
{{- if eq (include "workbench.authType" .) "demo" -}}
{{- $_ := set $keys "demo-password" .Values.secrets.demoPassword -}}
{{- end -}}
{{- $data := dict -}}
{{- range $key, $given := $keys -}}
{{- if $given -}}
{{- $_ := set $data $key ($given | b64enc) -}}
{{- else if hasKey $previous $key -}}
{{- $_ := set $data $key (index $previous $key) -}}
{{- else if eq $key "demo-password" -}}
{{- $_ := set $data $key (randAlphaNum 16 | b64enc) -}}
{{- else -}}
{{- $_ := set $data $key (include "workbench.randHex" $ | b64enc) -}}
{{- end -}}
{{- end -}}
{{- toYaml $data -}}
{{- end -}}

{{/* Service URLs (inside the namespace). */}}
{{- define "workbench.hubUrl" -}}
{{- printf "http://%s:8081" (include "workbench.name" (dict "root" . "part" "hub")) -}}
{{- end -}}

{{- define "workbench.gatewayApiUrl" -}}
{{- printf "http://%s.%s:8000/api" (include "workbench.name" (dict "root" . "part" "gateway-api")) .Release.Namespace -}}
{{- end -}}

{{- define "workbench.gatewayProxyHost" -}}
{{- printf "%s.%s" (include "workbench.name" (dict "root" . "part" "gateway-proxy")) .Release.Namespace -}}
{{- end -}}

{{/* The dashboard guard: the hub service dask-gateway (workbench.kubernetes.hub.GUARD_PORT). */}}
{{- define "workbench.guardUrl" -}}
{{- printf "http://%s.%s:8000" (include "workbench.name" (dict "root" . "part" "gateway-guard")) .Release.Namespace -}}
{{- end -}}

{{/* The quota service: the hub service quota. */}}
{{- define "workbench.quotaUrl" -}}
{{- printf "http://%s:8013" (include "workbench.name" (dict "root" . "part" "quota")) -}}
{{- end -}}

{{/* The sessions service: the hub service sessions (workbench.services.sessions; the embedded mode's port). */}}
{{- define "workbench.sessionsUrl" -}}
{{- printf "http://%s:8014" (include "workbench.name" (dict "root" . "part" "sessions")) -}}
{{- end -}}

{{/* Where notebook pods reach the hub services (quota, sessions) for their notifications: the proxy's
Service inside the cluster, which routes /services/<name>/ to each. */}}
{{- define "workbench.servicesUrl" -}}
{{- printf "http://%s:%v/services/" (include "workbench.name" (dict "root" . "part" "proxy-public")) .Values.proxy.service.port -}}
{{- end -}}

{{/* The roster service: the hub service rosters (workbench.services.rosters; the embedded mode's port). */}}
{{- define "workbench.rostersUrl" -}}
{{- printf "http://%s:8015" (include "workbench.name" (dict "root" . "part" "rosters")) -}}
{{- end -}}

{{/* Courses of the effective policy (groups of kind course), as a JSON list. */}}
{{- define "workbench.courses" -}}
{{- $p := include "workbench.platform" . | fromJson -}}
{{- $courses := list -}}
{{- range $name, $g := ($p.groups | default dict) -}}
{{- if eq (($g | default dict).kind | default "") "course" }}{{ $courses = append $courses $name }}{{ end -}}
{{- end -}}
{{- toJson $courses -}}
{{- end -}}

{{/* "true" when the roster service runs: rosters.enabled, or (null) when the policy has a course. */}}
{{- define "workbench.rostersEnabled" -}}
{{- $e := .Values.rosters.enabled -}}
{{- if kindIs "invalid" $e -}}
{{- if include "workbench.courses" . | fromJsonArray }}true{{ end -}}
{{- else if $e }}true{{ end -}}
{{- end -}}

{{/* "true" when notebook pods ask hub services (quota, sessions, rosters) through the proxy. */}}
{{- define "workbench.anyService" -}}
{{- if or .Values.quota.enabled .Values.sessions.enabled (include "workbench.rostersEnabled" .) .Values.jobs.enabled }}true{{ end -}}
{{- end -}}

{{/* The quota ledger's database: "url" (the operator's Secret) or "sqlite-pvc" (the default). */}}
{{- define "workbench.quotaDb" -}}
{{- $url := .Values.quota.db.url -}}
{{- if and (kindIs "map" $url) $url.existingSecret }}url{{ else }}sqlite-pvc{{ end -}}
{{- end -}}

{{/* Environment shared by the gateway API server and controller. */}}
{{- define "workbench.gatewayEnv" -}}
- name: WORKBENCH_PLATFORM
  value: /etc/workbench/platform.yaml
- name: WORKBENCH_NAMESPACE
  valueFrom:
    fieldRef: {fieldPath: metadata.namespace}
- name: WORKBENCH_GATEWAY_INSTANCE
  value: {{ include "workbench.gatewayInstance" . | quote }}
- name: WORKBENCH_GATEWAY_API_URL
  value: {{ include "workbench.gatewayApiUrl" . | quote }}
- name: WORKBENCH_HUB_API_URL
  value: {{ printf "%s/hub/api" (include "workbench.hubUrl" .) | quote }}
{{- with .Values.images.pullSecrets }}
- name: WORKBENCH_IMAGE_PULL_SECRETS  # Dask scheduler and worker pods (KubeClusterConfig.image_pull_secrets)
  value: {{ include "workbench.pullSecretNames" $ | quote }}
{{- end }}
{{- if .Values.quota.enabled }}
- name: WORKBENCH_QUOTA_URL  # schedulers and workers admitted and accounted by the quota service (JUPYTERHUB_API_TOKEN)
  value: {{ include "workbench.quotaUrl" . | quote }}
{{- end }}
{{- include "workbench.gpuPodEnv" . }}
{{- end -}}

{{/* How pods that request a GPU are built (notebooks by the hub, Dask workers by the gateway): gpu.* values. */}}
{{- define "workbench.gpuPodEnv" -}}
{{- with .Values.gpu.runtimeClassName }}
- name: WORKBENCH_GPU_RUNTIME_CLASS  # runtimeClassName of pods that request a GPU
  value: {{ . | quote }}
{{- end }}
- name: WORKBENCH_GPU_DEV_SHM  # "true": a memory-backed /dev/shm, sized as the pod's memory limit
  value: {{ .Values.gpu.devShm.enabled | toString | quote }}
{{- end -}}

{{- define "workbench.hubSpawnEnv" -}}
{{- include "workbench.gpuPodEnv" . }}
{{- end -}}

{{/* Volumes every workbench Python process mounts: the platform YAML (read-only) and a writable /tmp. */}}
{{- define "workbench.platformVolume" -}}
- name: platform
  configMap:
    name: {{ include "workbench.name" (dict "root" . "part" "platform") }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "workbench.platformMounts" -}}
- name: platform
  mountPath: /etc/workbench
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/*
Operator settings of one component's pods (zero-to-jupyterhub's names). Called with
  (dict "root" $ "v" <the component's values> "defaults" <values it falls back on, or {}>
        "platform" <mounts the platform ConfigMap?> "secret" <reads the release's Secret?>)
`defaults` is gateway.* for the gateway's four parts (gateway.nodeSelector ... apply to all of them).
*/}}
{{- define "workbench.podAnnotations" -}}
{{- $d := .defaults | default dict -}}
{{- if .platform }}
checksum/platform: {{ include "workbench.platform" .root | sha256sum }}
{{- end }}
{{- if .secret }}
{{ include "workbench.secretChecksum" .root }}
{{- end }}
{{- with merge (dict) (.v.podAnnotations | default dict) ($d.podAnnotations | default dict) }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "workbench.podScheduling" -}}
{{- $v := .v -}}
{{- $d := .defaults | default dict -}}
{{- with .root.Values.images.pullSecrets }}
imagePullSecrets:
  {{- include "workbench.imagePullSecrets" $.root | nindent 2 }}
{{- end }}
{{- with ($v.nodeSelector | default $d.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with ($v.tolerations | default $d.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with ($v.affinity | default $d.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with ($v.topologySpreadConstraints | default $d.topologySpreadConstraints) }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with ($v.priorityClassName | default $d.priorityClassName) }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* extraEnv: a map NAME -> value (a string) or {valueFrom: ...} (keyed by name, so Helm merges it). */}}
{{- define "workbench.extraEnv" -}}
{{- range $name, $val := (.v.extraEnv | default dict) }}
- name: {{ $name | quote }}
  {{- if kindIs "map" $val }}
  {{- toYaml $val | nindent 2 }}
  {{- else }}
  value: {{ $val | toString | quote }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* extraVolumes: a map name -> volume source; extraVolumeMounts: a map volume name -> {mountPath, ...}. */}}
{{- define "workbench.extraVolumes" -}}
{{- range $name, $src := (.v.extraVolumes | default dict) }}
- name: {{ $name | quote }}
  {{- toYaml $src | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "workbench.extraVolumeMounts" -}}
{{- range $name, $mount := (.v.extraVolumeMounts | default dict) }}
- name: {{ $name | quote }}
  {{- toYaml $mount | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A probe from values ({enabled, httpGet/tcpSocket given by the template, periods and thresholds}). */}}
{{- define "workbench.probe" -}}
{{- $p := .probe -}}
{{ toYaml .handler }}
{{- range $k := list "initialDelaySeconds" "periodSeconds" "timeoutSeconds" "failureThreshold" }}
{{- if hasKey $p $k }}
{{ $k }}: {{ index $p $k | int }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A PodDisruptionBudget of one component (.v.pdb: {enabled, minAvailable, maxUnavailable}). */}}
{{- define "workbench.pdb" -}}
{{- $pdb := .v.pdb | default dict -}}
{{- if $pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "workbench.name" (dict "root" .root "part" .component) }}
  labels:
    {{- include "workbench.labels" (dict "root" .root "component" .component) | nindent 4 }}
spec:
  {{- if not (kindIs "invalid" $pdb.maxUnavailable) }}
  maxUnavailable: {{ $pdb.maxUnavailable }}
  {{- else }}
  minAvailable: {{ $pdb.minAvailable | default 1 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "workbench.selectorLabels" (dict "root" .root "component" .component) | nindent 6 }}
{{- end }}
{{- end -}}

{{/* The DNS egress rule of every restricted pod (port 53 only): networkPolicy.egressAllowRules and dnsPeers. */}}
{{- define "workbench.dnsEgress" -}}
{{- $np := .Values.networkPolicy -}}
{{- $rules := $np.egressAllowRules -}}
{{- $peers := list -}}
{{- if $rules.dnsPortsKubeSystemNamespace -}}
{{- $peers = append $peers (dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" "kube-system"))) -}}
{{- end -}}
{{- if $rules.dnsPortsPrivateIPs -}}
{{- range list "10.0.0.0/8" "172.16.0.0/12" "192.168.0.0/16" -}}
{{- $peers = append $peers (dict "ipBlock" (dict "cidr" .)) -}}
{{- end -}}
{{- end -}}
{{- if $rules.dnsPortsCloudMetadataServer -}}
{{- $peers = append $peers (dict "ipBlock" (dict "cidr" "169.254.169.254/32")) -}}
{{- end -}}
{{- if $rules.dnsPortsNodeLocalDNSCache -}}
{{- $peers = append $peers (dict "ipBlock" (dict "cidr" "169.254.20.10/32")) -}}
{{- end -}}
{{- range $name := keys ($np.dnsPeers | default dict) | sortAlpha -}}
{{- $peers = append $peers (index $np.dnsPeers $name) -}}
{{- end -}}
{{- if $peers -}}
{{- toYaml (list (dict "to" $peers "ports" (list (dict "port" 53 "protocol" "UDP") (dict "port" 53 "protocol" "TCP")))) -}}
{{- end -}}
{{- end -}}

{{/* Egress rules of networkPolicy.<singleuser|dask>.egress: on-premises CIDRs and ports. */}}
{{- define "workbench.extraEgress" -}}
{{- range $name := keys (.egress | default dict) | sortAlpha -}}
{{- $e := index $.egress $name -}}
{{- $to := list -}}
{{- range $e.cidrs }}{{ $to = append $to (dict "ipBlock" (dict "cidr" .)) }}{{ end -}}
{{- $ports := list -}}
{{- range $e.ports }}{{ $ports = append $ports (dict "port" (int .) "protocol" ($e.protocol | default "TCP")) }}{{ end }}
# {{ $name }}
{{ toYaml (list (dict "to" $to "ports" $ports)) }}
{{- end -}}
{{- end -}}

{{/* Ingress from metrics scrapers (networkPolicy.metricsScrapers) on one port. */}}
{{- define "workbench.metricsIngress" -}}
{{- $scrapers := .root.Values.networkPolicy.metricsScrapers | default dict -}}
{{- if $scrapers -}}
{{- $from := list -}}
{{- range $name := keys $scrapers | sortAlpha }}{{ $from = append $from (index $scrapers $name) }}{{ end -}}
{{ toYaml (list (dict "from" $from "ports" (list (dict "port" .port "protocol" "TCP")))) }}
{{- end -}}
{{- end -}}

{{/* A Kubernetes quantity from a policy value (a string as written, or a number: JSON numbers are floats). */}}
{{- define "workbench.quantity" -}}
{{- if kindIs "string" . -}}
{{- . -}}
{{- else if kindIs "invalid" . -}}
0
{{- else if eq (float64 .) (float64 (int64 .)) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{- define "workbench.user-placeholderEnabled" -}}
{{- if .Values.scheduling.userPlaceholder.enabled }}true{{ end -}}
{{- end -}}

{{- define "workbench.image-pullerEnabled" -}}
{{- if .Values.prePuller.continuous.enabled }}true{{ end -}}
{{- end -}}
