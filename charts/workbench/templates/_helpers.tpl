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
